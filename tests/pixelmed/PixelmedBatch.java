// Pixelmed's validators over many files in one JVM: the SR validator compiles its XSLT templates once
// (about 10 s of CPU), not once per file as its command line does. Run with Java's single-file launcher:
//   java -cp /usr/share/java/pixelmed.jar PixelmedBatch.java FILE...
// Each file's report follows a line "==> FILE" (SR: DicomSRValidator; other objects: DicomInstanceValidator).
import com.pixelmed.dicom.AttributeList;
import com.pixelmed.dicom.SOPClass;
import com.pixelmed.dicom.TagFromName;
import com.pixelmed.validate.DicomInstanceValidator;
import com.pixelmed.validate.DicomSRValidator;

public class PixelmedBatch {
    public static void main(String[] files) throws Exception {
        DicomSRValidator sr = null;
        DicomInstanceValidator iod = null;
        for (String file : files) {
            System.out.println("==> " + file);
            AttributeList list = new AttributeList();
            list.read(file);
            String sopClass = com.pixelmed.dicom.Attribute.getSingleStringValueOrEmptyString(list, TagFromName.SOPClassUID);
            if (SOPClass.isStructuredReport(sopClass)) {
                if (sr == null) sr = new DicomSRValidator();
                System.out.println(sr.validate(list));
            } else {
                if (iod == null) iod = new DicomInstanceValidator();
                System.out.println(iod.validate(list));
            }
        }
    }
}
