// Pixelmed's validators over many files in one JVM: the SR validator compiles its XSLT templates once
// (about 5-10 s of CPU), not once per file as its command line does. Run with Java's single-file launcher:
//   java -cp /usr/share/java/pixelmed.jar PixelmedBatch.java FILE...
//   java -cp /usr/share/java/pixelmed.jar PixelmedBatch.java --serve   (paths on stdin, one per line;
//        a line "--end--" closes a batch and is answered "==< done": one JVM for a whole test session)
// Each file's report follows a line "==> FILE" (SR: DicomSRValidator; other objects: DicomInstanceValidator).
import com.pixelmed.dicom.AttributeList;
import com.pixelmed.dicom.SOPClass;
import com.pixelmed.dicom.TagFromName;
import com.pixelmed.validate.DicomInstanceValidator;
import com.pixelmed.validate.DicomSRValidator;
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;

public class PixelmedBatch {
    private static DicomSRValidator sr = null;
    private static DicomInstanceValidator iod = null;

    private static void validate(String file) throws Exception {
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

    public static void main(String[] args) throws Exception {
        if (args.length == 1 && args[0].equals("--serve")) {
            BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
            String line;
            while ((line = in.readLine()) != null) {
                if (line.equals("--end--")) {
                    System.out.println("==< done");
                    System.out.flush();
                    continue;
                }
                try {
                    validate(line);
                } catch (Exception e) {  // a file Pixelmed cannot read is an error of that file, not the end
                    System.out.println("Error: Pixelmed could not read or validate the file: " + e);
                }
            }
            return;
        }
        for (String file : args) validate(file);
    }
}
